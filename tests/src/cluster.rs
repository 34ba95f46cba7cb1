//! The cluster fixture: N simulated hosts (plus an optional diskless witness), each a
//! network namespace running its own `tandemd`, wired to two switches.
//!
//! ```text
//!                 switch namespace  tdm-<pid>-<n>-sw
//!        br-mgmt (management)              br-repl (replication)
//!        |m0   |m1   |m2                   |r0   |r1   |r2        <- ports cut by fault ops
//!   mgmt |     |     |                repl |     |     |
//!      [hv1] [hv2] [witness]             [hv1] [hv2] [witness]  <- one namespace per host
//!      10.77.R.11/24 ...                 10.78.R.11/24 ...
//! ```
//!
//! Each host has a management link (its `control` address, port 7700) and a separate
//! replication link (its `replication` address, port 7788), each a veth pair whose switch
//! end is a bridge port. Cutting a link sets the switch end down: the host's interface
//! loses carrier, nothing is delivered either way, and established TCP connections stall
//! as with a pulled cable (no RST). `R` is a per-run byte; the addresses exist only inside
//! this fixture's namespaces, so parallel clusters could not collide even with equal `R`.
//!
//! Per host, under the cluster's temp dir `<tmp>/tdm-<pid>-<n>-XXXX/<host>/`:
//! `tandem.toml` (every host in `[[nodes]]`, the witness `diskless = true` and without
//! `[[pools]]`), `state/`, `run/` (`tandemd.sock`, `nbd.sock`), `images/` (the `files`
//! pool, data hosts only; a tmpfs of `pool_size` bytes when set, with `cache = "writeback"`,
//! so [`Cluster::fill_pool`] hits a real ENOSPC without touching other tests), `tandemd.log` (appended across
//! restarts). `<tmp>/.../secret` is shared (mode 0600).
//!
//! Drop (also while unwinding from a panic) kills every process in the namespaces,
//! unmounts the pools, deletes the namespaces and the directory. A process killed before
//! its Drop ran leaves names with its dead pid; [`crate::netns::sweep_stale`] (called by
//! [`Cluster::new`]) removes them.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::netns::{self, Netns};
use crate::{bin, wait_until, CmdOutput};

/// Control API port on the management address.
pub const CONTROL_PORT: u16 = 7700;
/// Replication port on the replication address.
pub const REPLICATION_PORT: u16 = 7788;

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of data hosts, named `hv1`, `hv2`, ...
    pub hosts: usize,
    /// Add a diskless tiebreaker named `witness`.
    pub witness: bool,
    /// Put each host's file pool on a tmpfs of this many bytes (needed by `fill_pool`).
    pub pool_size: Option<u64>,
    /// Start every daemon in `Cluster::new`.
    pub start: bool,
    /// `RUST_LOG` for the daemons.
    pub rust_log: String,
    /// The file pools' `cache` key; `None`: the default (`none`), or `writeback` on a
    /// tmpfs pool.
    pub cache: Option<String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            hosts: 2,
            witness: true,
            pool_size: None,
            start: true,
            rust_log: "debug".into(),
            cache: None,
        }
    }
}

/// Which of a host's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Management,
    Replication,
}

/// One simulated host.
pub struct Host {
    pub name: String,
    pub diskless: bool,
    pub mgmt_addr: Ipv4Addr,
    pub repl_addr: Ipv4Addr,
    dir: PathBuf,
    netns: Netns,
    mgmt_port: String,
    repl_port: String,
    pool_mounted: bool,
    daemon: Option<Child>,
}

impl Host {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("tandem.toml")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("tandemd.sock")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.run_dir().join("nbd.sock")
    }
    pub fn pool_dir(&self) -> PathBuf {
        self.dir.join("images")
    }
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tandemd.log")).unwrap_or_default()
    }
    pub fn running(&self) -> bool {
        self.daemon.is_some()
    }
    /// The pid of the host's `tandemd` (`ip netns exec` execs it in place).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }
}

/// The running cluster. See the module doc.
pub struct Cluster {
    tag: String,
    spec: ClusterSpec,
    hosts: Vec<Host>,
    switch: Option<Netns>,
    dir: Option<tempfile::TempDir>,
}

/// Skip-or-require for tests using this fixture: returns true when the test should return
/// early (only if `TANDEM_SKIP_NETNS_TESTS=1`); panics when not root.
pub fn skip_unless_root() -> bool {
    if netns::skip_requested() {
        eprintln!("{}=1: skipping namespace test", netns::SKIP_ENV);
        return true;
    }
    netns::require_root();
    false
}

impl Cluster {
    /// Build namespaces, links, configs and (with `spec.start`) start every daemon.
    pub fn new(spec: ClusterSpec) -> Cluster {
        netns::require_root();
        assert!(spec.hosts >= 1 && spec.hosts <= 200, "1..=200 hosts");
        let swept = netns::sweep_stale();
        if !swept.is_empty() {
            eprintln!("removed leftovers of dead test runs: {swept:?}");
        }
        let tag = netns::unique_tag();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir()
            .expect("create cluster dir");
        let run_byte = 1
            + (std::process::id().wrapping_mul(31).wrapping_add(
                tag.rsplit('-')
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0),
            ) % 250) as u8;

        let mut cluster = Cluster {
            tag: tag.clone(),
            spec: spec.clone(),
            hosts: Vec::new(),
            switch: None,
            dir: Some(dir),
        };
        let switch = Netns::add(&format!("{tag}-sw")).expect("create switch namespace");
        for bridge in ["br-mgmt", "br-repl"] {
            switch
                .ip(&["link", "add", bridge, "type", "bridge"])
                .expect("create bridge");
            switch
                .ip(&["link", "set", bridge, "up"])
                .expect("bridge up");
        }
        cluster.switch = Some(switch);

        let mut names: Vec<(String, bool)> = (1..=spec.hosts)
            .map(|i| (format!("hv{i}"), false))
            .collect();
        if spec.witness {
            names.push(("witness".to_string(), true));
        }
        let root = cluster.root().to_path_buf();
        let secret = root.join("secret");
        std::fs::write(&secret, format!("{tag}-{:x}\n", rand_u64())).expect("write secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .expect("chmod secret");

        for (index, (name, diskless)) in names.iter().enumerate() {
            let host = cluster.add_host(index, name, *diskless, run_byte);
            cluster.hosts.push(host);
        }
        let all: Vec<String> = cluster.hosts.iter().map(|h| h.name.clone()).collect();
        for host in &all {
            cluster.write_config(host, &all);
        }
        if spec.start {
            let names: Vec<String> = cluster.hosts.iter().map(|h| h.name.clone()).collect();
            for name in names {
                cluster.start(&name);
            }
        }
        cluster
    }

    /// Write `host`'s `tandem.toml` with `members` (host names of this cluster, in
    /// cluster order) as its `[[nodes]]`.
    fn write_config(&self, host: &str, members: &[String]) {
        let nodes_toml: String = self
            .hosts
            .iter()
            .filter(|h| members.contains(&h.name))
            .map(|h| {
                format!(
                    "\n[[nodes]]\nname = \"{}\"\ncontrol = \"{}:{CONTROL_PORT}\"\nreplication = \"{}:{REPLICATION_PORT}\"\n{}",
                    h.name,
                    h.mgmt_addr,
                    h.repl_addr,
                    if h.diskless { "diskless = true\n" } else { "" }
                )
            })
            .collect();
        let host = self.host(host);
        // The witness stores nothing: no pool, as on a real tiebreaker.
        let pool = if host.diskless {
            String::new()
        } else {
            // A tmpfs pool has no O_DIRECT before Linux 6.6 (CI runs Debian 12's 6.1).
            let cache = match (&self.spec.cache, self.spec.pool_size) {
                (Some(cache), _) => format!("cache = \"{cache}\"\n"),
                (None, Some(_)) => "cache = \"writeback\"\n".to_string(),
                (None, None) => String::new(),
            };
            format!(
                "\n[[pools]]\nname = \"files\"\nbackend = \"file\"\npath = \"{}/images\"\n{cache}",
                host.dir.display()
            )
        };
        let config = format!(
            "node = \"{name}\"\nstate_dir = \"{dir}/state\"\nrun_dir = \"{dir}/run\"\nsecret_file = \"{secret}\"\n{nodes_toml}{pool}",
            name = host.name,
            dir = host.dir.display(),
            secret = self.secret_file().display(),
        );
        std::fs::write(host.config(), config).expect("write host config");
    }

    /// Rewrite `host`'s config with only `members` in `[[nodes]]` (a cluster that does
    /// not know some hosts yet, or a node list edited for a join or removal). The running
    /// daemon reads it at its next reload ([`Cluster::sighup`]) or start.
    pub fn set_node_list(&self, host: &str, members: &[&str]) {
        let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        self.write_config(host, &members);
    }

    /// Send SIGHUP (reload the config) to `host`'s daemon.
    pub fn sighup(&self, host: &str) {
        let pid = self
            .host(host)
            .daemon_pid()
            .unwrap_or_else(|| panic!("tandemd not running on {host}"));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    }

    fn add_host(&mut self, index: usize, name: &str, diskless: bool, run_byte: u8) -> Host {
        let switch = self.switch.as_ref().expect("switch exists");
        let netns = Netns::add(&format!("{}-{name}", self.tag)).expect("create host namespace");
        let octet = 11 + index as u8;
        let mgmt_addr = Ipv4Addr::new(10, 77, run_byte, octet);
        let repl_addr = Ipv4Addr::new(10, 78, run_byte, octet);
        let mgmt_port = format!("m{index}");
        let repl_port = format!("r{index}");
        for (port, inner, bridge, addr) in [
            (&mgmt_port, "mgmt", "br-mgmt", mgmt_addr),
            (&repl_port, "repl", "br-repl", repl_addr),
        ] {
            switch
                .ip(&[
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    inner,
                    "netns",
                    netns.name(),
                ])
                .expect("create veth pair");
            switch
                .ip(&["link", "set", port, "master", bridge, "up"])
                .expect("attach port to bridge");
            netns
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", inner])
                .expect("address host link");
            netns
                .ip(&["link", "set", inner, "up"])
                .expect("host link up");
        }
        let dir = self.root().join(name);
        let subs: &[&str] = if diskless {
            &["state", "run"]
        } else {
            &["state", "run", "images"]
        };
        for sub in subs {
            std::fs::create_dir_all(dir.join(sub)).expect("create host dirs");
        }
        let mut pool_mounted = false;
        if let (Some(size), false) = (self.spec.pool_size, diskless) {
            let images = dir.join("images");
            netns::run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tandem-test-pool",
                    images.to_str().expect("utf-8 path"),
                ],
            )
            .expect("mount tmpfs pool");
            pool_mounted = true;
        }
        Host {
            name: name.to_string(),
            diskless,
            mgmt_addr,
            repl_addr,
            dir,
            netns,
            mgmt_port,
            repl_port,
            pool_mounted,
            daemon: None,
        }
    }

    /// The cluster's directory.
    pub fn root(&self) -> &Path {
        self.dir.as_ref().expect("cluster dir").path()
    }

    /// The shared secret file.
    pub fn secret_file(&self) -> PathBuf {
        self.root().join("secret")
    }

    /// All hosts (data hosts first, then the witness).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Names of the data hosts (not the witness).
    pub fn data_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| !h.diskless)
            .map(|h| h.name.clone())
            .collect()
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host named {name} in this cluster"))
    }

    fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host named {name} in this cluster"))
    }

    pub fn nbd_socket(&self, name: &str) -> PathBuf {
        self.host(name).nbd_socket()
    }

    /// The backing file of `volume` in `name`'s file pool.
    pub fn image_path(&self, name: &str, volume: &str) -> PathBuf {
        self.host(name).pool_dir().join(format!("{volume}.img"))
    }

    /// Start `tandemd` in the host's namespace; waits (10 s) until its control and NBD
    /// sockets answer.
    pub fn start(&mut self, name: &str) {
        let tandemd = bin("tandemd");
        let rust_log = self.spec.rust_log.clone();
        let host = self.host_mut(name);
        assert!(host.daemon.is_none(), "tandemd already running on {name}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.dir.join("tandemd.log"))
            .expect("open daemon log");
        let child = host
            .netns
            .command(&tandemd)
            .arg("--config")
            .arg(host.config())
            .env("RUST_LOG", &rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tandemd in namespace");
        host.daemon = Some(child);
        let socket = host.control_socket();
        let nbd = host.nbd_socket();
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(10), || {
            if let Some(status) = host
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(status);
                return true;
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
                && std::os::unix::net::UnixStream::connect(&nbd).is_ok()
        });
        if let Some(status) = exited {
            host.daemon = None;
            panic!(
                "tandemd on {name} exited during startup ({status}):\n{}",
                host.log()
            );
        }
        assert!(
            ready,
            "tandemd on {name} did not answer within 10 s:\n{}",
            host.log()
        );
    }

    /// SIGTERM the host's daemon and wait (10 s) for it to exit.
    pub fn stop(&mut self, name: &str) -> std::process::ExitStatus {
        let host = self.host_mut(name);
        let mut child = host
            .daemon
            .take()
            .unwrap_or_else(|| panic!("tandemd not running on {name}"));
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let mut status = None;
        wait_until(Duration::from_secs(10), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tandemd on {name} ignored SIGTERM for 10 s:\n{}",
                    host.log()
                );
            }
        }
    }

    /// SIGKILL the host's daemon (a daemon crash; the host's page cache survives).
    pub fn kill(&mut self, name: &str) {
        let host = self.host_mut(name);
        if let Some(mut child) = host.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop (SIGTERM) if running, then start.
    pub fn restart(&mut self, name: &str) {
        if self.host(name).running() {
            self.stop(name);
        }
        self.start(name);
    }

    /// Set the switch end of the host's `link` up or down. Bringing it up returns only once
    /// both ends report carrier and the bridge forwards on the port: the kernel applies a
    /// carrier change later (link watch, up to a second under load), and a probe sent
    /// before then is lost.
    fn set_port(&self, name: &str, link: Link, up: bool) {
        let host = self.host(name);
        let (port, inner) = match link {
            Link::Management => (&host.mgmt_port, "mgmt"),
            Link::Replication => (&host.repl_port, "repl"),
        };
        let switch = self.switch.as_ref().expect("switch exists");
        switch
            .ip(&["link", "set", port, if up { "up" } else { "down" }])
            .expect("set switch port");
        if !up {
            return;
        }
        let link_state = |netns: &Netns, dev: &str| -> serde_json::Value {
            let json = netns
                .ip(&["-j", "-d", "link", "show", "dev", dev])
                .expect("ip link show");
            serde_json::from_str(&json).expect("ip -j output")
        };
        let ready = wait_until(Duration::from_secs(10), || {
            let port = &link_state(switch, port)[0];
            let inner = &link_state(&host.netns, inner)[0];
            port["operstate"] == "UP"
                && port["linkinfo"]["info_slave_data"]["state"] == "forwarding"
                && inner["operstate"] == "UP"
        });
        assert!(
            ready,
            "{name}'s {inner} link did not come back up within 10 s"
        );
    }

    /// Cut the host's replication link only (management stays up).
    pub fn cut_replication(&self, name: &str) {
        self.set_port(name, Link::Replication, false);
    }

    /// Restore the host's replication link.
    pub fn heal_replication(&self, name: &str) {
        self.set_port(name, Link::Replication, true);
    }

    /// Drop every replication packet between `name` and each of `others` (an nftables
    /// table in `name`'s namespace, replacing an earlier one), leaving the links to
    /// everyone else as they are: an asymmetric partition. Established connections stall
    /// as with a pulled cable. [`Cluster::unblock_replication`] removes it.
    pub fn block_replication(&self, name: &str, others: &[&str]) {
        let mut rules = String::from("table inet tandem_block {\n");
        for (chain, hook, dir) in [("o", "output", "daddr"), ("i", "input", "saddr")] {
            rules += &format!(" chain {chain} {{ type filter hook {hook} priority 0;\n");
            for other in others {
                rules += &format!("  ip {dir} {} drop;\n", self.host(other).repl_addr);
            }
            rules += " }\n";
        }
        rules += "}\n";
        self.unblock_replication(name);
        let mut child = self
            .host(name)
            .netns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft (nftables)");
        child
            .stdin
            .take()
            .expect("nft stdin")
            .write_all(rules.as_bytes())
            .expect("write nft rules");
        let status = child.wait().expect("wait for nft");
        assert!(
            status.success(),
            "nft -f failed in {name}: {status}\n{rules}"
        );
    }

    /// Remove what [`Cluster::block_replication`] set up in `name` (if anything).
    pub fn unblock_replication(&self, name: &str) {
        let _ = self
            .host(name)
            .netns
            .command("nft")
            .args(["delete", "table", "inet", "tandem_block"])
            .stderr(Stdio::null())
            .status();
    }

    /// Cut both of the host's links.
    pub fn partition(&self, name: &str) {
        self.set_port(name, Link::Management, false);
        self.set_port(name, Link::Replication, false);
    }

    /// Restore both of the host's links.
    pub fn heal(&self, name: &str) {
        self.set_port(name, Link::Management, true);
        self.set_port(name, Link::Replication, true);
    }

    /// Whether a TCP connection from `from` reaches `to` over `link` within 1 s (probes
    /// with a listener on a spare port inside `to`'s namespace).
    pub fn can_connect(&self, from: &str, to: &str, link: Link) -> bool {
        let target = self.host(to);
        let addr = match link {
            Link::Management => target.mgmt_addr,
            Link::Replication => target.repl_addr,
        };
        let listener = target
            .netns
            .run_in(move || TcpListener::bind(SocketAddrV4::new(addr, 0)))
            .expect("enter namespace")
            .expect("bind probe listener");
        let port = listener.local_addr().expect("probe address").port();
        let dest = SocketAddr::V4(SocketAddrV4::new(addr, port));
        self.host(from)
            .netns
            .run_in(move || TcpStream::connect_timeout(&dest, Duration::from_secs(1)).is_ok())
            .expect("enter namespace")
    }

    /// Bytes (received, transmitted) so far on the host's end of `link`, from the kernel's
    /// interface counters: what really crossed the wire, whatever the daemon reports (e.g.
    /// to check that a resync moved about the changed data, not the volume).
    pub fn link_bytes(&self, name: &str, link: Link) -> (u64, u64) {
        let dev = match link {
            Link::Management => "mgmt",
            Link::Replication => "repl",
        };
        let json = self
            .host(name)
            .netns
            .ip(&["-j", "-s", "link", "show", "dev", dev])
            .expect("read link counters");
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let stats = &parsed[0]["stats64"];
        (
            stats["rx"]["bytes"].as_u64().expect("rx bytes"),
            stats["tx"]["bytes"].as_u64().expect("tx bytes"),
        )
    }

    /// Poll `tandem volume status VOLUME --json` on a host (every 200 ms, up to `timeout`)
    /// until `check` accepts it; returns that status, or panics with the last one and the
    /// daemon logs.
    pub fn wait_status(
        &self,
        name: &str,
        volume: &str,
        timeout: Duration,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let out = self.tandem(name, &["volume", "status", volume, "--json"]);
            let last = if out.status.success() {
                let status = out.json();
                if check(&status) {
                    return status;
                }
                status.to_string()
            } else {
                out.stderr
            };
            if std::time::Instant::now() >= deadline {
                panic!(
                    "status of {volume} on {name} did not reach the expected state in {timeout:?}; last: {last}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fill the host's pool file system until ENOSPC (the pool must be a tmpfs: set
    /// `ClusterSpec::pool_size`). Returns the bytes written; [`Cluster::unfill_pool`] frees
    /// them.
    pub fn fill_pool(&self, name: &str) -> u64 {
        let host = self.host(name);
        assert!(
            host.pool_mounted,
            "fill_pool needs ClusterSpec::pool_size (a tmpfs pool), not the shared disk"
        );
        let path = host.pool_dir().join(".fill");
        let mut file = std::fs::File::create(&path).expect("create fill file");
        let chunk = vec![0xa5u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling pool of {name}: {e}"),
            }
        }
        // Fill the last partial page too.
        while let Ok(n) = file.write(&chunk[..4096]) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        written
    }

    /// Remove what `fill_pool` wrote, and wait (5 s) until the file system shows free
    /// space: the space returns only when the last descriptor closes, and a process forked
    /// concurrently elsewhere may hold a copy until its exec.
    pub fn unfill_pool(&self, name: &str) {
        let pool = self.host(name).pool_dir();
        let _ = std::fs::remove_file(pool.join(".fill"));
        let path =
            std::ffi::CString::new(pool.to_string_lossy().as_bytes()).expect("path without NUL");
        let freed = wait_until(Duration::from_secs(5), || {
            // SAFETY: statvfs fills the zeroed struct we pass; the path is NUL-terminated.
            let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
            rc == 0 && stats.f_bavail > 16
        });
        assert!(
            freed,
            "pool of {name} shows no free space after removing the fill file"
        );
    }

    /// `tandem --config <host config> ARGS...` run inside the host's namespace.
    pub fn tandem(&self, name: &str, args: &[&str]) -> CmdOutput {
        let host = self.host(name);
        let out = host
            .netns
            .command(bin("tandem"))
            .arg("--config")
            .arg(host.config())
            .args(args)
            .output()
            .expect("run tandem");
        CmdOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `tandem volume status VOLUME --json` on a host, parsed (panics on failure).
    pub fn volume_status(&self, name: &str, volume: &str) -> serde_json::Value {
        self.tandem(name, &["volume", "status", volume, "--json"])
            .ok()
            .json()
    }

    /// Every host's daemon log, for failure messages.
    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| format!("===== {} tandemd.log =====\n{}", h.name, h.log()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for host in &self.hosts {
                let log = host.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "===== {} tandemd.log (last {} lines) =====\n{}",
                    host.name,
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
        for host in &mut self.hosts {
            if let Some(mut child) = host.daemon.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            host.netns.kill_all();
            if host.pool_mounted {
                let images = host.dir.join("images");
                if let Err(e) = netns::run("umount", &["-l", &images.to_string_lossy()]) {
                    eprintln!("warning: {e}");
                }
            }
        }
        // Host namespaces (and their veth ends), then the switch, then the files.
        self.hosts.clear();
        self.switch = None;
        if std::thread::panicking() && std::env::var_os("TANDEM_KEEP_CLUSTER").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("TANDEM_KEEP_CLUSTER: keeping {}", dir.keep().display());
            }
        }
        self.dir = None;
    }
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    u64::from_le_bytes(bytes)
}
