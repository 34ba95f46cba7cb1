//! The workload log: one text line per event, written with one `write(2)` each (so a
//! killed writer loses at most the line it was writing) and fsync'd at every flush and at
//! the end. A log on a terminal (a guest's second serial port, which survives the guest's
//! power cut) is drained (`tcdrain`) after every line instead: an `A` line has left the
//! machine before its write is sent.
//!
//! ```text
//! # tandem-check v1 run=00c0ffee00c0ffee export=vol1 blocks=1024 block_size=4096 seed=42
//! C /run/tandem/nbd.sock          connected (or reconnected) to this socket
//! A 17 3 [fua]                    attempting version 3 of block 17 (logged BEFORE sending)
//! K 17 3 [fua]                    the server acknowledged it (with FUA: durable)
//! E 17 3 ENOSPC                   the server failed it with an errno
//! F                               a FLUSH was acknowledged: every K above is durable
//! # free text                     comments (faults, reasons)
//! ```
//!
//! A write that has an `A` line but neither `K` nor `E` had an unknown outcome (the
//! connection broke); the verifier treats it, like an `E`, as possibly applied (in whole or
//! torn), never as required.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create log {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The first line's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    pub run_id: u64,
    pub export: String,
    pub blocks: u64,
    pub seed: u64,
}

/// Appends events to a log file.
pub struct LogWriter {
    file: File,
    path: PathBuf,
    /// The log is a terminal: drain it after each line; it cannot be fsync'd.
    tty: bool,
}

impl LogWriter {
    /// Create (truncate) the log and write its header.
    pub fn create(path: &Path, header: &LogHeader) -> Result<LogWriter, LogError> {
        let file = File::create(path).map_err(|source| LogError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: isatty only inspects the descriptor we own.
        let tty = unsafe { libc::isatty(std::os::unix::io::AsRawFd::as_raw_fd(&file)) } == 1;
        let mut log = LogWriter {
            file,
            path: path.to_path_buf(),
            tty,
        };
        log.line(&format!(
            "# tandem-check v1 run={:016x} export={} blocks={} block_size={} seed={}",
            header.run_id,
            header.export,
            header.blocks,
            super::block::BLOCK_SIZE,
            header.seed
        ))?;
        log.sync()?;
        Ok(log)
    }

    fn line(&mut self, text: &str) -> Result<(), LogError> {
        let mut buf = String::with_capacity(text.len() + 1);
        buf.push_str(text);
        buf.push('\n');
        self.file
            .write_all(buf.as_bytes())
            .map_err(|source| LogError::Write {
                path: self.path.clone(),
                source,
            })?;
        if self.tty {
            self.drain()?;
        }
        Ok(())
    }

    /// Wait until the terminal has sent everything written so far.
    fn drain(&mut self) -> Result<(), LogError> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: tcdrain only waits on the descriptor we own.
        if unsafe { libc::tcdrain(self.file.as_raw_fd()) } != 0 {
            return Err(LogError::Write {
                path: self.path.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn connected(&mut self, socket: &Path) -> Result<(), LogError> {
        self.line(&format!("C {}", socket.display()))
    }
    pub fn attempt(&mut self, block: u64, version: u64, fua: bool) -> Result<(), LogError> {
        self.line(&format!(
            "A {block} {version}{}",
            if fua { " fua" } else { "" }
        ))
    }
    pub fn acknowledged(&mut self, block: u64, version: u64, fua: bool) -> Result<(), LogError> {
        self.line(&format!(
            "K {block} {version}{}",
            if fua { " fua" } else { "" }
        ))
    }
    pub fn failed(&mut self, block: u64, version: u64, errno: &str) -> Result<(), LogError> {
        self.line(&format!("E {block} {version} {errno}"))
    }
    /// A FLUSH was acknowledged; also fsyncs the log.
    pub fn flushed(&mut self) -> Result<(), LogError> {
        self.line("F")?;
        self.sync()
    }
    pub fn comment(&mut self, text: &str) -> Result<(), LogError> {
        self.line(&format!("# {}", text.replace('\n', " ")))
    }
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.tty {
            return self.drain();
        }
        self.file.sync_data().map_err(|source| LogError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Everything the log says about one block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockHistory {
    /// Every version sent (acknowledged, failed or unknown).
    pub attempted: Vec<u64>,
    /// Highest acknowledged version.
    pub last_acked: Option<u64>,
    /// Highest version acknowledged and made durable (FUA write or a later FLUSH).
    pub last_durable: Option<u64>,
}

/// A parsed log.
#[derive(Debug, Clone)]
pub struct History {
    pub header: LogHeader,
    pub blocks: BTreeMap<u64, BlockHistory>,
    pub writes_attempted: u64,
    pub writes_acknowledged: u64,
    pub writes_failed: u64,
    pub flushes: u64,
    /// The writer died with its host (a power cut): the log may lack its last attempts, so
    /// a block may hold a version of this run newer than any logged for it. Set by the
    /// caller; [`super::verify::verify`] then accepts such versions (counted as unlogged).
    pub writer_crashed: bool,
}

fn parse_kv(path: &Path, line: &str) -> Result<LogHeader, LogError> {
    let err = |message: String| LogError::Parse {
        path: path.to_path_buf(),
        line: 1,
        message,
    };
    if !line.starts_with("# tandem-check v1 ") {
        return Err(err("not a tandem-check v1 log (bad header)".into()));
    }
    let mut fields = BTreeMap::new();
    for word in line.split_whitespace().skip(3) {
        if let Some((k, v)) = word.split_once('=') {
            fields.insert(k.to_string(), v.to_string());
        }
    }
    let get = |k: &str| {
        fields
            .get(k)
            .cloned()
            .ok_or_else(|| err(format!("header lacks {k}=")))
    };
    let block_size = get("block_size")?;
    if block_size != super::block::BLOCK_SIZE.to_string() {
        return Err(err(format!("block_size {block_size} is not supported")));
    }
    Ok(LogHeader {
        run_id: u64::from_str_radix(&get("run")?, 16).map_err(|e| err(format!("run: {e}")))?,
        export: get("export")?,
        blocks: get("blocks")?
            .parse()
            .map_err(|e| err(format!("blocks: {e}")))?,
        seed: get("seed")?
            .parse()
            .map_err(|e| err(format!("seed: {e}")))?,
    })
}

/// Read and parse a log. A truncated last line (the writer was killed mid-line) is ignored.
pub fn read_history(path: &Path) -> Result<History, LogError> {
    let text = std::fs::read_to_string(path).map_err(|source| LogError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut lines = complete.lines();
    let header = parse_kv(path, lines.next().unwrap_or_default())?;
    let mut history = History {
        header,
        blocks: BTreeMap::new(),
        writes_attempted: 0,
        writes_acknowledged: 0,
        writes_failed: 0,
        flushes: 0,
        writer_crashed: false,
    };
    // Acknowledged but not yet covered by a FLUSH: (block, version).
    let mut unflushed: Vec<(u64, u64)> = Vec::new();
    for (index, line) in lines.enumerate() {
        let number = index + 2;
        let err = |message: String| LogError::Parse {
            path: path.to_path_buf(),
            line: number,
            message,
        };
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or("#");
        let mut num = |what: &str| -> Result<u64, LogError> {
            words
                .next()
                .ok_or_else(|| err(format!("missing {what}")))?
                .parse::<u64>()
                .map_err(|e| err(format!("{what}: {e}")))
        };
        match kind {
            "A" => {
                let block = num("block")?;
                let version = num("version")?;
                if block >= history.header.blocks {
                    return Err(err(format!(
                        "block {block} outside the run's {} blocks",
                        history.header.blocks
                    )));
                }
                history.writes_attempted += 1;
                history
                    .blocks
                    .entry(block)
                    .or_default()
                    .attempted
                    .push(version);
            }
            "K" => {
                let block = num("block")?;
                let version = num("version")?;
                let entry = history
                    .blocks
                    .get_mut(&block)
                    .filter(|h| h.attempted.contains(&version));
                let Some(entry) = entry else {
                    return Err(err(format!(
                        "acknowledgement of {block}/{version} without an attempt"
                    )));
                };
                history.writes_acknowledged += 1;
                entry.last_acked = entry.last_acked.max(Some(version));
                let fua = line.ends_with(" fua");
                if fua {
                    entry.last_durable = entry.last_durable.max(Some(version));
                } else {
                    unflushed.push((block, version));
                }
            }
            "E" => {
                num("block")?;
                num("version")?;
                history.writes_failed += 1;
            }
            "F" => {
                history.flushes += 1;
                for (block, version) in unflushed.drain(..) {
                    if let Some(entry) = history.blocks.get_mut(&block) {
                        entry.last_durable = entry.last_durable.max(Some(version));
                    }
                }
            }
            "C" | "#" => {}
            other => return Err(err(format!("unknown event {other:?}"))),
        }
    }
    Ok(history)
}
