//! Network namespaces for simulated hosts: create, run commands or threads inside, kill
//! what runs there, delete — and sweep namespaces and mounts left behind by test processes
//! that died without cleaning up.
//!
//! Every name this module creates starts with `tdm-<pid>-`, so the sweeper can tell whose
//! it is: a name whose pid no longer runs is stale. Needs root; [`require_root`] fails the
//! test with a clear message otherwise, unless `TANDEM_SKIP_NETNS_TESTS=1` asks to skip.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Prefix of every namespace (and per-run mount point tag) this module creates.
pub const PREFIX: &str = "tdm-";
/// Set to 1 to skip the namespace tests explicitly (they never skip silently).
pub const SKIP_ENV: &str = "TANDEM_SKIP_NETNS_TESTS";

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A command exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// Entering a namespace from a thread failed.
    #[error("cannot enter network namespace {name}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the caller asked to skip namespace tests (`TANDEM_SKIP_NETNS_TESTS=1`).
pub fn skip_requested() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

/// Panic with a clear message unless running as root (namespace tests need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test creates network namespaces and needs root (CI runs as root); \
         run it with sudo, or set {SKIP_ENV}=1 to skip it explicitly"
    );
}

/// Run a command to completion; its stdout on success.
pub fn run(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    run("ip", args)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh per-run tag `tdm-<pid>-<n>` for names of one fixture.
pub fn unique_tag() -> String {
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted (with everything running in it killed) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME` and bring its loopback up.
    pub fn add(name: &str) -> Result<Netns, NetnsError> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`, which execs
    /// the program, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .stdin(Stdio::null());
        command
    }

    /// Pids of every process in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_of(&self.name)
    }

    /// SIGKILL everything in the namespace and wait (up to 5 s) until it is empty.
    pub fn kill_all(&self) {
        kill_all_in(&self.name);
    }

    /// Run `f` on a thread that has entered this namespace (sockets it creates live here).
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        run_in_named(&self.name, f)
    }
}

/// [`Netns::run_in`] for the namespace called `name`.
pub fn run_in_named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let name = name.to_string();
    let path = Path::new("/run/netns").join(&name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter {
            name: name.clone(),
            source,
        })?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace fd we own; it affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(NetnsError::Enter {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(f())
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

fn pids_of(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_all_in(name: &str) {
    for _ in 0..250 {
        let pids = pids_of(name);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) on processes inside a namespace this fixture created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: processes still running in namespace {name}");
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name `tdm-<pid>-...`, if it is one of ours.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Remove namespaces and mounts named `tdm-<pid>-...` whose pid is dead (left by a test
/// process that was killed before its Drop guards ran). Returns what was removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    // Mounts first (mount points contain the tag in their path).
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut points: Vec<String> = mountinfo
            .lines()
            .filter_map(|line| line.split_whitespace().nth(4).map(str::to_string))
            // Namespace files under /run/netns are bind mounts too; `ip netns del` owns them.
            .filter(|point| {
                !point.starts_with("/run/netns/") && !point.starts_with("/var/run/netns/")
            })
            .filter(|point| {
                point
                    .split('/')
                    .any(|part| owner_pid(part).is_some_and(|pid| !pid_alive(pid)))
            })
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            if run("umount", &["-l", &point]).is_ok() {
                removed.push(point);
            }
        }
    }
    let listed = ip(&["netns", "list"]).unwrap_or_default();
    for line in listed.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) {
            kill_all_in(name);
            if ip(&["netns", "del", name]).is_ok() {
                removed.push(name.to_string());
            }
        }
    }
    // Temp dirs of dead runs (`<tmp>/tdm-<pid>-<n>-XXXX`), after their mounts are gone.
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !pid_alive(pid))
                && std::fs::remove_dir_all(entry.path()).is_ok()
            {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("tdm-123-4-hv1"), Some(123));
        assert_eq!(owner_pid("tandem-cluster-tdm"), None);
        assert_eq!(owner_pid("tdm-x-1"), None);
    }
}
