//! HA-agent test support: a `tandem-ha run` per [`LibvirtHost`] (killed on drop), the
//! agent's `ha.toml`, status/events through the real CLI, fault injection on one host's
//! links (nftables inside the host's namespace), and small domain XMLs.
//!
//! Fault injection: [`cut_replication`] drops TCP on the replication port (7788) between two
//! hosts, leaving the management network (tandemd 7700, agents 7701) alone;
//! [`isolate`] takes the host's only interface down (both paths); [`kill_host`] SIGKILLs
//! every process of the host's namespace (tandemd, libvirtd, QEMU, the agent) and takes its
//! interface down, as a power loss would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::libvirt::LibvirtHost;
use crate::{tail, wait_until, CmdOutput};

/// `ha.toml` for tests: the defaults, with dead-after `dead_after_ms`.
pub fn write_ha_toml(host: &LibvirtHost, extra: &str) {
    std::fs::write(host.path("etc-tandem/ha.toml"), extra).expect("writing ha.toml");
}

/// A running `tandem-ha run` inside a host.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Start the agent of `host` (its stderr goes to `<host dir>/tandem-ha.log`).
    pub fn start(host: &LibvirtHost) -> Agent {
        let log = host.path("tandem-ha.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let child = host
            .command("tandem-ha", &["run"])
            .env("RUST_LOG", "info,ha_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawning tandem-ha run");
        Agent {
            child: Some(child),
            log,
        }
    }

    /// SIGKILL the agent (a hung or crashed agent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `tandem-ha ARGS` inside `host`.
pub fn ha(host: &LibvirtHost, args: &[&str]) -> CmdOutput {
    host.exec("tandem-ha", args)
}

/// `tandem-ha status --json` of `host`'s agent, or None while it does not answer.
pub fn status(host: &LibvirtHost) -> Option<serde_json::Value> {
    let out = ha(host, &["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_str(&out.stdout).ok()
}

/// The status entry of `vm` in `host`'s agent.
pub fn vm_status(host: &LibvirtHost, vm: &str) -> Option<serde_json::Value> {
    status(host)?["vms"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vm)
        .cloned()
}

/// Whether `host`'s agent sees `peer` alive on the management network.
pub fn sees_alive(host: &LibvirtHost, peer: &str) -> Option<bool> {
    status(host)?["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == peer)
        .and_then(|p| p["management_alive"].as_bool())
}

/// Wait until every agent sees every other alive; on failure, show what each agent says.
/// Up to 60 s, generous: a test bed shares this machine's two CPUs with another test's TCG
/// guest. The time it took is printed.
pub fn wait_all_alive(hosts: &[&LibvirtHost]) {
    let timeout = Duration::from_secs(60);
    let started = Instant::now();
    let ok = wait_until(timeout, || {
        hosts.iter().all(|h| {
            hosts
                .iter()
                .filter(|o| o.node != h.node)
                .all(|o| sees_alive(h, &o.node) == Some(true))
        })
    });
    if !ok {
        let mut why = String::new();
        for h in hosts {
            let out = ha(h, &["status", "--json"]);
            let log = std::fs::read_to_string(h.path("tandem-ha.log")).unwrap_or_default();
            why.push_str(&format!(
                "--- {}: `tandem-ha status --json` ({}): {}{}\n--- {} agent log, last 40 lines:\n{}\n",
                h.node,
                out.status,
                out.stdout.trim(),
                out.stderr.trim(),
                h.node,
                tail(&log, 40),
            ));
        }
        panic!("agents did not see each other alive within {timeout:?}\n{why}");
    }
    eprintln!(
        "[ha] agents see each other after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The events of `host`'s agent (`tandem-ha events --json`).
pub fn events(host: &LibvirtHost) -> Vec<serde_json::Value> {
    ha(host, &["events", "--json"])
        .ok()
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A domain that needs nothing but SeaBIOS: it runs (looking for a boot device) until
/// destroyed. `disks_xml` are its `<disk>` elements.
pub fn bios_domain_xml(name: &str, disks_xml: &str) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"#
    )
}

/// A `<disk>` for Tandem volume `volume` on the standard NBD socket.
pub fn tandem_disk_xml(volume: &str, target: &str) -> String {
    format!(
        "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      \
         <source protocol='nbd' name='{volume}'><host transport='unix' socket='/run/tandem/nbd.sock'/></source>\n      \
         <target dev='{target}' bus='virtio'/>\n    </disk>"
    )
}

/// `virsh define` `xml` on `host`.
pub fn define(host: &LibvirtHost, name: &str, xml: &str) {
    let path = host.path(&format!("{name}.xml"));
    std::fs::write(&path, xml).expect("writing domain XML");
    host.virsh(&["define", path.to_str().expect("utf-8 path")])
        .ok();
}

fn nft(host: &LibvirtHost, script: &str) -> CmdOutput {
    let out = Command::new("ip")
        .args(["netns", "exec", &host.netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(script.as_bytes())?;
            }
            c.wait_with_output()
        })
        .expect("running nft");
    CmdOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Drop replication traffic (TCP port 7788, both directions) between `host` and `peer_ip`.
pub fn cut_replication(host: &LibvirtHost, peer_ip: std::net::Ipv4Addr) {
    nft(
        host,
        &format!(
            "table inet tandem_fault {{\n chain input {{ type filter hook input priority 0; \
             ip saddr {peer_ip} tcp dport 7788 drop\n ip saddr {peer_ip} tcp sport 7788 drop\n }}\n \
             chain output {{ type filter hook output priority 0; \
             ip daddr {peer_ip} tcp dport 7788 drop\n ip daddr {peer_ip} tcp sport 7788 drop\n }}\n}}\n"
        ),
    )
    .ok();
}

/// Remove every fault [`cut_replication`] installed on `host`.
pub fn heal_replication(host: &LibvirtHost) {
    nft(host, "delete table inet tandem_fault\n").ok();
}

/// Take `host`'s interface down (`up = false`) or up again: both paths at once.
pub fn set_link(host: &LibvirtHost, up: bool) {
    let state = if up { "up" } else { "down" };
    let out = Command::new("ip")
        .args(["-n", &host.netns, "link", "set", "eth0", state])
        .output()
        .expect("ip link set");
    assert!(
        out.status.success(),
        "ip link set eth0 {state}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Power loss: interface down, then SIGKILL every process of the host's namespace.
pub fn kill_host(host: &LibvirtHost) {
    set_link(host, false);
    let pids = Command::new("ip")
        .args(["netns", "pids", &host.netns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on pids listed in a namespace this test created.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Poll until `host`'s agent reports `vm` running there; returns the elapsed time.
pub fn wait_running_here(host: &LibvirtHost, vm: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    wait_until(timeout, || {
        std::thread::sleep(Duration::from_millis(100));
        vm_status(host, vm).is_some_and(|v| v["running_here"] == true)
    })
    .then(|| started.elapsed())
}
