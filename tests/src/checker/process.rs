//! Driving the `tandem-check` binary from tests: a background writer (SIGTERM ends it
//! cleanly and yields its JSON summary; dropped, it is killed) and one-shot `verify`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{bin, wait_until};

/// A running `tandem-check write --json`.
pub struct BackgroundWriter {
    child: Option<Child>,
    pub log: PathBuf,
}

impl BackgroundWriter {
    /// Spawn `tandem-check write` with `--socket sockets[0] --reconnect-to sockets[1..]`,
    /// `--log log --json`, and `extra` arguments (limits, seed, timeouts).
    pub fn spawn(
        sockets: &[PathBuf],
        export: &str,
        blocks: u64,
        log: &Path,
        extra: &[&str],
    ) -> BackgroundWriter {
        let mut command = Command::new(bin("tandem-check"));
        command
            .arg("write")
            .arg("--socket")
            .arg(&sockets[0])
            .args([
                "--export",
                export,
                "--blocks",
                &blocks.to_string(),
                "--json",
                "--log",
            ])
            .arg(log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if sockets.len() > 1 {
            let rest: Vec<String> = sockets[1..]
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            command.arg("--reconnect-to").arg(rest.join(","));
        }
        let child = command.spawn().expect("spawn tandem-check write");
        BackgroundWriter {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// Lines of the log starting with `prefix` (e.g. "K " for acknowledgements).
    pub fn count(&self, prefix: &str) -> usize {
        count_lines(&self.log, prefix)
    }

    /// Wait (up to `timeout`) until at least `n` more acknowledgements than now are logged.
    pub fn wait_for_more_acks(&self, n: usize, timeout: Duration) -> bool {
        let start = self.count("K ");
        wait_until(timeout, || self.count("K ") >= start + n)
    }

    /// Whether the writer process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGTERM, wait, and return (exit code, JSON summary).
    pub fn stop(mut self) -> (Option<i32>, serde_json::Value) {
        let child = self.child.take().expect("writer running");
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let out = child.wait_with_output().expect("wait for tandem-check");
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("tandem-check summary is not JSON ({e}): {text:?}"));
        (out.status.code(), summary)
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Count log lines starting with `prefix`.
pub fn count_lines(log: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

/// `tandem-check verify --json --log LOG ARGS...` → (exit code, report).
pub fn verify(log: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(bin("tandem-check"))
        .arg("verify")
        .arg("--log")
        .arg(log)
        .arg("--json")
        .args(args)
        .output()
        .expect("run tandem-check verify");
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "tandem-check verify printed no JSON ({e}): {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}
