//! The host side of a lab VM's command agent: shell scripts go to the guest over a virtio
//! serial port (a unix socket of QEMU's), the output and exit status come back.
//!
//! Wire format (the guest half is the loop at the end of `tests/vm/lab-host.sh`):
//! host → guest `ID BASE64(SCRIPT)\n`; guest → host `@@OUT ID\n`, the output (stdout and
//! stderr together) in base64 lines, `@@RC ID STATUS\n`. Commands run one at a time.
//! Answers to other IDs (a command whose client went away) are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a command in the guest printed and how it exited.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: i32,
    pub output: Vec<u8>,
}

impl Output {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// The output as text, or an error with it when the status is not 0.
    pub fn ok(self, what: &str) -> Result<String> {
        if self.status != 0 {
            bail!(
                "{what} failed (status {}): {}",
                self.status,
                self.text().trim()
            );
        }
        Ok(self.text())
    }
}

/// A connection to one guest's agent.
pub struct Agent {
    socket: PathBuf,
    reader: Option<BufReader<UnixStream>>,
    next_id: u64,
}

impl Agent {
    pub fn new(socket: &Path) -> Agent {
        Agent {
            socket: socket.to_path_buf(),
            reader: None,
            next_id: u64::from(std::process::id()) << 32,
        }
    }

    /// Forget the connection (the VM was restarted: its socket is a new one).
    pub fn reset(&mut self) {
        self.reader = None;
    }

    /// Runs `script` with the guest's `sh` and waits up to `timeout` for it to end.
    pub fn run(&mut self, script: &str, timeout: Duration) -> Result<Output> {
        let result = self.run_once(script, timeout);
        if result.is_err() {
            // The stream may hold half an answer: start clean next time.
            self.reader = None;
        }
        result.with_context(|| format!("agent {}: {}", self.socket.display(), first_line(script)))
    }

    fn run_once(&mut self, script: &str, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        if self.reader.is_none() {
            let stream = UnixStream::connect(&self.socket)
                .with_context(|| format!("connecting to {}", self.socket.display()))?;
            self.reader = Some(BufReader::new(stream));
        }
        let Some(reader) = self.reader.as_mut() else {
            bail!("no connection");
        };
        self.next_id += 1;
        let id = self.next_id;
        reader
            .get_mut()
            .write_all(format!("{id} {}\n", encode(script.as_bytes())).as_bytes())
            .context("sending the command")?;
        let mut encoded = String::new();
        let mut inside = false;
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no answer within {:.0} s", timeout.as_secs_f64());
            }
            reader.get_mut().set_read_timeout(Some(left))?;
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => bail!("the guest closed the agent connection"),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("no answer within {:.0} s", timeout.as_secs_f64())
                }
                Err(e) => return Err(e).context("reading the answer"),
            }
            let text = line.trim_end();
            if let Some(rest) = text.strip_prefix("@@OUT ") {
                inside = rest.trim() == id.to_string();
                encoded.clear();
            } else if let Some(rest) = text.strip_prefix("@@RC ") {
                let mut words = rest.split_whitespace();
                if inside && words.next() == Some(&id.to_string()) {
                    let status = words
                        .next()
                        .and_then(|w| w.parse().ok())
                        .context("malformed @@RC line")?;
                    let output = decode(&encoded).context("decoding the command output")?;
                    return Ok(Output { status, output });
                }
                inside = false;
            } else if inside {
                encoded.push_str(text);
            }
        }
    }
}

fn first_line(script: &str) -> &str {
    let line = script.trim_start().lines().next().unwrap_or_default();
    &line[..line.len().min(80)]
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, on one line (what busybox `base64 -d` reads).
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64, ignoring whitespace.
pub fn decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' | b' ' => continue,
            other => bail!("byte {other:#x} is not base64"),
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_values() {
        assert_eq!(encode(b""), "");
        assert_eq!(encode(b"f"), "Zg==");
        assert_eq!(encode(b"fo"), "Zm8=");
        assert_eq!(encode(b"foo"), "Zm9v");
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(decode("Zm9v\nYmE=\n").unwrap(), b"fooba");
        let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
        assert_eq!(decode(&encode(&data)).unwrap(), data);
        assert!(decode("Zm9*").is_err());
    }
}
