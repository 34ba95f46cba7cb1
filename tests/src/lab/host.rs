//! One lab host: its QEMU process (started daemonized inside the lab's network namespace,
//! found again through its pidfile, so `scripts/lab` invocations share it), its disk, its
//! console log and its agent. Faults act on the process: a power cut is SIGKILL (the
//! guest's page cache and everything QEMU had not yet written are gone), a freeze SIGSTOP;
//! an orderly shutdown goes through the guest (tandemd stopped, state unmounted, sync,
//! power off) and the next [`Host::boot`] is a fresh QEMU on the same disk: a reboot.
//!
//! The NVMe disk is a raw file opened with `cache=none` (O_DIRECT on the outer host): the
//! guest sees a volatile write cache and must flush, and a write QEMU completed to the
//! guest has left QEMU's own memory, so a SIGKILL loses exactly what a real power cut of
//! the host's RAM loses, not more. It loses less than real hardware in one respect: data
//! in the outer host's disk cache survives (the outer host does not lose power).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::tail;

use super::agent::Agent;

/// MAC address of a host's NIC: `net` 1 = management, 2 = replication (the guest script
/// finds its NICs by these).
pub fn mac(index: usize, net: u8) -> String {
    format!("52:54:00:77:{index:02x}:{net:02x}")
}

/// Tap device names in the lab namespace (at most 15 bytes).
pub fn tap(name: &str, net: u8) -> String {
    let prefix = if net == 1 { "lm-" } else { "lr-" };
    let mut tap = format!("{prefix}{name}");
    tap.truncate(15);
    tap
}

/// How every host VM of a lab is started.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub netns: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `tcg` or `kvm`.
    pub accel: String,
    pub memory_mib: u32,
    /// Extra kernel command line words for every host (e.g. the test-only switch).
    pub append: String,
}

/// A lab host.
pub struct Host {
    pub name: String,
    /// 1-based; decides addresses and MACs.
    pub index: usize,
    pub dir: PathBuf,
    pub agent: Agent,
}

impl Host {
    pub fn new(lab_dir: &Path, name: &str, index: usize) -> Host {
        let dir = lab_dir.join(name);
        let agent = Agent::new(&dir.join("agent.sock"));
        Host {
            name: name.to_string(),
            index,
            dir,
            agent,
        }
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("nvme.img")
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The QEMU process id, if it runs.
    pub fn pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive.then_some(pid)
    }

    /// Creates the host's directory and its sparse disk of `disk_bytes` (once).
    pub fn create(&self, disk_bytes: u64) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if !self.disk().exists() {
            std::fs::File::create(self.disk())
                .and_then(|f| f.set_len(disk_bytes))
                .with_context(|| format!("creating {}", self.disk().display()))?;
        }
        Ok(())
    }

    /// The QEMU command line; `hold` keeps tandemd stopped after boot (`lab.hold=1`).
    pub fn command(&self, spec: &BootSpec, hold: bool) -> Command {
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 lab.host={} lab.index={}",
            self.name, self.index
        );
        if hold {
            append.push_str(" lab.hold=1");
        }
        if !spec.append.is_empty() {
            append.push(' ');
            append.push_str(&spec.append);
        }
        let path = |p: PathBuf| p.display().to_string().replace(',', ",,");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &spec.netns, super::QEMU]);
        cmd.args(["-accel", &spec.accel, "-smp", "1", "-m"])
            .arg(spec.memory_mib.to_string())
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                path(self.console())
            ))
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .arg("-append")
            .arg(append)
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=nvme0,format=raw,cache=none,aio=threads",
                path(self.disk())
            ))
            .arg("-device")
            .arg(format!("nvme,drive=nvme0,serial=tandem-{}", self.name));
        for net in [1u8, 2] {
            cmd.arg("-netdev")
                .arg(format!(
                    "tap,id=net{net},ifname={},script=no,downscript=no",
                    tap(&self.name, net)
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=net{net},mac={}",
                    mac(self.index, net)
                ));
        }
        cmd.args(["-device", "virtio-serial-pci", "-chardev"])
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(self.dir.join("agent.sock"))
            ))
            .args(["-device", "virtserialport,chardev=agent,name=lab.agent"])
            .arg("-pidfile")
            .arg(self.pidfile())
            .arg("-daemonize");
        cmd
    }

    /// Starts QEMU (daemonized) and waits until the guest prints `@@LAB-READY`; returns the
    /// boot time (QEMU start to ready).
    pub fn boot(&mut self, spec: &BootSpec, hold: bool, timeout: Duration) -> Result<Duration> {
        if let Some(pid) = self.pid() {
            bail!("{} already runs (QEMU pid {pid})", self.name);
        }
        let start_at = std::fs::metadata(self.console()).map_or(0, |m| m.len());
        let started = Instant::now();
        let output = self
            .command(spec, hold)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("starting QEMU for {}", self.name))?;
        if !output.status.success() {
            bail!(
                "QEMU for {} failed to start ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        self.agent.reset();
        let ready = format!("@@LAB-READY {}", self.name);
        loop {
            let console = self.console_since(start_at);
            if console.contains(&ready) {
                if let Some(line) = console.lines().find(|l| l.starts_with("@@LAB-ERROR")) {
                    bail!("{} booted with an error: {line}", self.name);
                }
                return Ok(started.elapsed());
            }
            if self.pid().is_none() {
                bail!(
                    "{}: QEMU exited during boot; console tail:\n{}",
                    self.name,
                    tail(&console, 30)
                );
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} not ready within {:.0} s; console tail:\n{}",
                    self.name,
                    timeout.as_secs_f64(),
                    tail(&console, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn console_since(&self, offset: u64) -> String {
        let bytes = std::fs::read(self.console()).unwrap_or_default();
        let from = (offset as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).replace('\r', "")
    }

    /// Power cut: SIGKILL of QEMU, then waits for the process to be gone.
    pub fn power_cut(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.pid().is_some() {
            if Instant::now() > deadline {
                bail!("QEMU of {} survived SIGKILL", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.agent.reset();
        Ok(())
    }

    /// Orderly shutdown: tandemd stops (SIGTERM) and is waited for, the state LV is
    /// unmounted, the guest syncs and powers off; then waits for QEMU to exit.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        // The power-off runs after the answer has left (the agent answers when sh exits).
        self.sh_ok(
            "pid=$(cat /run/tandemd.pid 2>/dev/null)\n\
             lab-tandemd stop\n\
             i=0; while [ -n \"$pid\" ] && grep -qs '^State:.*[RSDT]' /proc/$pid/status \
             && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done\n\
             [ $i -lt 300 ] || { echo 'tandemd did not stop'; exit 1; }\n\
             sync; umount /var/lib/tandem-lab || mount -o remount,ro /var/lib/tandem-lab\n\
             vgchange -q -an vg_nvme >/dev/null 2>&1; sync\n\
             setsid sh -c 'sleep 1; poweroff -f' >/dev/null 2>&1 </dev/null &",
            Duration::from_secs(90),
        )?;
        let deadline = Instant::now() + timeout;
        while self.pid().is_some() {
            if Instant::now() > deadline {
                bail!(
                    "{} did not power off within {:.0} s",
                    self.name,
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.agent.reset();
        Ok(())
    }

    /// Freeze (SIGSTOP) or resume (SIGCONT) the whole VM.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        self.signal(if frozen { libc::SIGSTOP } else { libc::SIGCONT })
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.name);
        };
        // SAFETY: plain kill(2) on a pid read from our own pidfile.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to QEMU of {}", self.name));
        }
        Ok(())
    }

    /// Runs a shell script in the guest. A failure (no answer in time, a lost
    /// connection) carries the guest's console tail, which shows a hung or crashed guest.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Result<super::agent::Output> {
        self.agent.run(script, timeout).with_context(|| {
            format!(
                "on {}; console tail:\n{}",
                self.name,
                tail(&self.console_since(0), 30)
            )
        })
    }

    /// Runs a shell script in the guest and returns its output; fails unless it exits 0.
    pub fn sh_ok(&mut self, script: &str, timeout: Duration) -> Result<String> {
        let name = self.name.clone();
        self.sh(script, timeout)?
            .ok(&format!("{name}: {}", script.lines().next().unwrap_or("")))
    }
}
