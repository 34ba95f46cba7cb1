//! A real libvirtd per simulated host, with that host's tandemd and the Tandem hook.
//!
//! [`LibvirtHost::start`] creates a network namespace and, inside it, a private mount
//! namespace in which the host sees its own directories at the standard paths:
//!
//! ```text
//! host path (outside)        inside the host's mount namespace
//! <dir>/etc-libvirt      ->  /etc/libvirt   (qemu.conf: root, no labels; hooks/qemu.d/tandem)
//! <dir>/etc-tandem       ->  /etc/tandem    (tandem.toml: run_dir = /run/tandem)
//! <dir>/run-libvirt      ->  /run/libvirt   (libvirt-sock, reached by virsh from outside)
//! <dir>/run-tandem       ->  /run/tandem    (tandemd.sock, nbd.sock, libvirt-hook/hook.log)
//! <dir>/var-{lib,log,cache}-libvirt -> /var/{lib,log,cache}/libvirt
//! <dir>/passwd, group    ->  /etc/passwd, /etc/group (+ libvirt-qemu, kvm: libvirtd's
//!                            QEMU driver resolves them at start even when running as root)
//! ```
//!
//! on a tmpfs `/run`. virtlogd, libvirtd (daemonized) and tandemd (in the foreground, the
//! process this fixture spawns) all run there, so the hook that libvirtd runs reads the
//! host's `/etc/tandem/tandem.toml` and reaches the host's tandemd, and the QEMU that
//! libvirtd starts opens the host's `/run/tandem/nbd.sock`: exactly the production paths.
//! From outside, `virsh -c 'qemu:///system?socket=<dir>/run-libvirt/libvirt-sock'` reaches
//! the daemon ([`LibvirtHost::virsh`]); [`LibvirtHost::exec`] runs a command inside the
//! host (nsenter into tandemd's namespaces), e.g. `tandem volume create`.
//!
//! [`Cluster::start`] puts several such hosts on one simulated network (a bridge, one veth
//! per host), lists every node in every host's Tandem config and lets each libvirtd listen
//! on TCP (for live migration between hosts).
//!
//! Dropping the host kills every process in its network namespace (`ip netns pids`: the
//! daemons and any QEMU), deletes the namespace and the directory. The only traces outside
//! are the empty mount points `/etc/tandem`, `/var/{lib,log,cache}/libvirt` when missing.
//!
//! Needs root, `libvirt-daemon`, `libvirt-daemon-driver-qemu`, `libvirt-clients`,
//! `qemu-system-x86`, `iproute2`, `util-linux` (unshare, nsenter). Tests fail when one is
//! missing unless `TANDEM_SKIP_LIBVIRT_TESTS=1` ([`skip_requested`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::vm::GuestImage;
use crate::{bin, wait_until, CmdOutput};

/// True when `TANDEM_SKIP_LIBVIRT_TESTS` is set (non-empty, not `0`).
pub fn skip_requested() -> bool {
    match std::env::var("TANDEM_SKIP_LIBVIRT_TESTS") {
        Ok(v) => !v.is_empty() && v != "0",
        Err(_) => false,
    }
}

/// Fails with the Debian package to install when a needed program is missing.
pub fn require_tools() -> Result<()> {
    let tools = [
        ("libvirtd", "libvirt-daemon"),
        ("virtlogd", "libvirt-daemon"),
        ("virsh", "libvirt-clients"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
    ];
    let missing: Vec<String> = tools
        .iter()
        .filter(|(program, _)| which(program).is_none())
        .map(|(program, package)| format!("{program} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing for libvirt tests: {}; install them or set TANDEM_SKIP_LIBVIRT_TESTS=1",
            missing.join(", ")
        );
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
        .exists()
        && !Path::new("/usr/lib64/libvirt/connection-driver/libvirt_driver_qemu.so").exists()
    {
        bail!("libvirt's QEMU driver is missing: install libvirt-daemon-driver-qemu (or set TANDEM_SKIP_LIBVIRT_TESTS=1)");
    }
    Ok(())
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn run(command: &mut Command) -> Result<CmdOutput> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(CmdOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// One simulated host: network + mount namespace, virtlogd, libvirtd, tandemd, the hook.
pub struct LibvirtHost {
    /// This host's node name in the Tandem config.
    pub node: String,
    /// The network namespace.
    pub netns: String,
    dir: tempfile::TempDir,
    tandemd: Option<Child>,
    cluster: Option<ClusterView>,
}

/// Standard directories bound per host; created on the real root when missing.
const BOUND_DIRS: &[(&str, &str)] = &[
    ("etc-libvirt", "/etc/libvirt"),
    ("etc-tandem", "/etc/tandem"),
    ("var-lib-libvirt", "/var/lib/libvirt"),
    ("var-log-libvirt", "/var/log/libvirt"),
    ("var-cache-libvirt", "/var/cache/libvirt"),
];

/// Where a host sits on the simulated management/replication network of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This host's address on the cluster network.
    pub ip: Ipv4Addr,
    /// Every node of the cluster (name, address), this one included.
    pub nodes: Vec<(String, Ipv4Addr)>,
    /// The shared peer-authentication secret.
    pub secret: String,
}

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl LibvirtHost {
    /// Start a host named `node` with an empty `file` pool `files`, the hook installed from
    /// this build, and wait (up to 30 s) until libvirtd and tandemd answer.
    pub fn start(node: &str) -> Result<LibvirtHost> {
        LibvirtHost::start_with(node, true)
    }

    /// Like [`LibvirtHost::start`]; without the hook when `install_hook` is false (to test
    /// installing it into a running libvirtd).
    pub fn start_with(node: &str, install_hook: bool) -> Result<LibvirtHost> {
        let mut host = LibvirtHost::create(node, install_hook, None)?;
        host.spawn_daemons()?;
        Ok(host)
    }

    /// Directories, configs, hook and network namespace; no daemons yet.
    fn create(node: &str, install_hook: bool, cluster: Option<ClusterView>) -> Result<LibvirtHost> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tandem-libvirt-{node}-"))
            .tempdir()
            .context("creating the host directory")?;
        let host = LibvirtHost {
            node: node.to_string(),
            netns: unique_name("tlv"),
            dir,
            tandemd: None,
            cluster,
        };
        host.prepare_dirs()?;
        if install_hook {
            let out = run(Command::new(bin("tandem-libvirt-hook"))
                .arg("install")
                .arg("--no-reload")
                .arg("--hooks-dir")
                .arg(host.path("etc-libvirt/hooks")))?;
            if !out.status.success() {
                bail!("installing the hook failed: {}", out.stderr);
            }
        }
        let out = run(Command::new("ip").args(["netns", "add", &host.netns]))?;
        if !out.status.success() {
            bail!("ip netns add {} failed: {}", host.netns, out.stderr);
        }
        run(Command::new("ip").args(["-n", &host.netns, "link", "set", "lo", "up"]))?;
        Ok(host)
    }

    /// This host's address on the cluster network (None for a lone host).
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.cluster.as_ref().map(|c| c.ip)
    }

    /// The URI other hosts use to reach this host's libvirtd (cluster hosts only), e.g. for
    /// `virsh migrate --live DOMAIN <uri>`.
    pub fn tcp_uri(&self) -> Option<String> {
        self.ip().map(|ip| format!("qemu+tcp://{ip}/system"))
    }

    /// A path inside the host's directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// libvirtd's socket, for `virsh -c qemu:///system?socket=...`.
    pub fn libvirt_socket(&self) -> PathBuf {
        self.path("run-libvirt/libvirt-sock")
    }

    /// The connection URI for this host's libvirtd, usable from outside.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.libvirt_socket().display())
    }

    /// tandemd's control socket, seen from outside.
    pub fn control_socket(&self) -> PathBuf {
        self.path("run-tandem/tandemd.sock")
    }

    /// tandemd's NBD socket, seen from outside (`/run/tandem/nbd.sock` inside).
    pub fn nbd_socket(&self) -> PathBuf {
        self.path("run-tandem/nbd.sock")
    }

    /// What the hook logged.
    pub fn hook_log(&self) -> String {
        std::fs::read_to_string(self.path("run-tandem/libvirt-hook/hook.log")).unwrap_or_default()
    }

    pub fn tandemd_log(&self) -> String {
        std::fs::read_to_string(self.path("tandemd.log")).unwrap_or_default()
    }

    pub fn libvirtd_log(&self) -> String {
        std::fs::read_to_string(self.path("var-log-libvirt/libvirtd.log")).unwrap_or_default()
    }

    /// A domain's QEMU log (libvirt's `/var/log/libvirt/qemu/<domain>.log`).
    pub fn qemu_log(&self, domain: &str) -> String {
        std::fs::read_to_string(self.path(&format!("var-log-libvirt/qemu/{domain}.log")))
            .unwrap_or_default()
    }

    fn prepare_dirs(&self) -> Result<()> {
        for (rel, _) in BOUND_DIRS {
            std::fs::create_dir_all(self.path(rel))?;
        }
        for rel in ["run-libvirt", "run-tandem", "state", "images"] {
            std::fs::create_dir_all(self.path(rel))?;
        }
        std::fs::write(
            self.path("etc-libvirt/qemu.conf"),
            "# test instance: QEMU runs as root, no labelling, no security driver\n\
             user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\n",
        )?;
        let mut libvirtd_conf = String::from(
            "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nunix_sock_rw_perms = \"0700\"\n\
             log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n",
        );
        if let Some(cluster) = &self.cluster {
            // Other hosts reach this libvirtd over TCP (live migration), inside the test net.
            // Every simulated host shares the machine's SMBIOS/hostname: give each its own
            // host UUID, or libvirt refuses a migration "to the same host".
            let [a, b, c, d] = cluster.ip.octets();
            libvirtd_conf.push_str(&format!(
                "listen_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\nlisten_addr = \"0.0.0.0\"\n\
                 host_uuid = \"7a4d0000-0000-4000-8000-{a:02x}{b:02x}{c:02x}{d:02x}{:04x}\"\n",
                std::process::id() & 0xffff
            ));
        }
        std::fs::write(self.path("etc-libvirt/libvirtd.conf"), libvirtd_conf)?;
        let nodes = match &self.cluster {
            None => vec![(self.node.clone(), Ipv4Addr::LOCALHOST)],
            Some(c) => c.nodes.clone(),
        };
        let mut nodes_toml = String::new();
        for (name, ip) in &nodes {
            // A node named `witness...` is a diskless tiebreaker.
            let diskless = if name.starts_with("witness") {
                "diskless = true\n"
            } else {
                ""
            };
            nodes_toml.push_str(&format!(
                "[[nodes]]\nname = \"{name}\"\ncontrol = \"{ip}:7700\"\nreplication = \"{ip}:7788\"\n{diskless}\n"
            ));
        }
        let secret = self
            .cluster
            .as_ref()
            .map(|c| c.secret.clone())
            .unwrap_or_else(|| format!("lone-{}", self.netns));
        std::fs::write(self.path("secret"), format!("{secret}\n"))?;
        std::fs::set_permissions(
            self.path("secret"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        std::fs::write(
            self.path("etc-tandem/tandem.toml"),
            format!(
                r#"node = "{node}"
state_dir = "{root}/state"
run_dir = "/run/tandem"
secret_file = "{root}/secret"

{nodes_toml}[[pools]]
name = "files"
backend = "file"
path = "{root}/images"
"#,
                node = self.node,
                root = self.dir().display()
            ),
        )?;
        // libvirtd's QEMU driver looks up its built-in default user and group
        // (libvirt-qemu, kvm) at start; give the host's view of /etc/passwd and /etc/group
        // those accounts without touching the real files.
        let mut passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
        let mut group = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
        let has = |db: &str, name: &str| db.lines().any(|l| l.split(':').next() == Some(name));
        if !has(&group, "kvm") {
            group.push_str("kvm:x:64054:\n");
        }
        if !has(&group, "libvirt-qemu") {
            group.push_str("libvirt-qemu:x:64055:\n");
        }
        if !has(&passwd, "libvirt-qemu") {
            passwd.push_str(
                "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n",
            );
        }
        std::fs::write(self.path("passwd"), passwd)?;
        std::fs::write(self.path("group"), group)?;
        Ok(())
    }

    fn spawn_daemons(&mut self) -> Result<()> {
        let d = self.dir().display().to_string();
        let mut script = String::from("set -e\n");
        for (_, target) in BOUND_DIRS {
            script.push_str(&format!("mkdir -p {target}\n"));
        }
        script.push_str(&format!(
            "mount --bind {d}/passwd /etc/passwd\nmount --bind {d}/group /etc/group\n\
             mount -t tmpfs tmpfs /run\nmkdir -p /run/libvirt /run/tandem\n\
             mount --bind {d}/run-libvirt /run/libvirt\nmount --bind {d}/run-tandem /run/tandem\n"
        ));
        for (rel, target) in BOUND_DIRS {
            script.push_str(&format!("mount --bind {d}/{rel} {target}\n"));
        }
        script.push_str(&format!(
            "virtlogd -d\nlibvirtd -d{}\nexec {} --config /etc/tandem/tandem.toml\n",
            if self.cluster.is_some() {
                " --listen"
            } else {
                ""
            },
            bin("tandemd").display()
        ));
        let log = std::fs::File::create(self.path("tandemd.log"))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the host's daemons")?;
        self.tandemd = Some(child);
        let started = Instant::now();
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(30), || {
            if let Some(status) = self
                .tandemd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(status);
                return true;
            }
            std::os::unix::net::UnixStream::connect(self.control_socket()).is_ok()
                && std::os::unix::net::UnixStream::connect(self.libvirt_socket()).is_ok()
        });
        if let Some(status) = exited {
            self.tandemd = None;
            bail!(
                "host {} daemons exited during startup ({status}):\n{}\nlibvirtd log:\n{}",
                self.node,
                self.tandemd_log(),
                self.libvirtd_log()
            );
        }
        if !ready {
            bail!(
                "host {}: libvirtd or tandemd did not answer within 30 s\ntandemd log:\n{}\nlibvirtd log:\n{}",
                self.node,
                self.tandemd_log(),
                self.libvirtd_log()
            );
        }
        // libvirtd opens its socket before its drivers are ready: wait for a real answer.
        let mut last = None;
        let ok = wait_until(Duration::from_secs(30), || {
            let out = self.virsh(&["list", "--all"]);
            let ok = out.status.success();
            last = Some(out);
            ok
        });
        if !ok {
            bail!(
                "host {}: virsh list failed for 30 s: {:?}\nlibvirtd log:\n{}",
                self.node,
                last,
                self.libvirtd_log()
            );
        }
        eprintln!(
            "[libvirt host {}] up in {:.1}s (netns {}, dir {})",
            self.node,
            started.elapsed().as_secs_f64(),
            self.netns,
            d
        );
        Ok(())
    }

    /// Stop tandemd (SIGTERM, as `systemctl restart` does) and start it again in the same
    /// namespaces, its log appended to the same file; returns once it answers. libvirtd and
    /// the domains keep running.
    pub fn restart_tandemd(&mut self) -> Result<()> {
        let old = self.pid();
        // Another process of the host (virtlogd, libvirtd, QEMU) keeps the namespaces to
        // enter after tandemd is gone.
        let pids = run(Command::new("ip").args(["netns", "pids", &self.netns]))?.stdout;
        let anchor = pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|&p| p != old)
            .context("no other process in the host's namespace")?;
        if let Some(mut child) = self.tandemd.take() {
            // SAFETY: kill(2) on the tandemd this host started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let stopped = wait_until(Duration::from_secs(30), || {
                child.try_wait().ok().flatten().is_some()
            });
            if !stopped {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.path("tandemd.log"))?;
        let child = Command::new("nsenter")
            .arg("-t")
            .arg(anchor.to_string())
            .args(["-m", "-n", "--"])
            .arg(bin("tandemd"))
            .args(["--config", "/etc/tandem/tandem.toml"])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tandemd again")?;
        self.tandemd = Some(child);
        if !wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(self.control_socket()).is_ok()
        }) {
            bail!(
                "host {}: tandemd did not answer after its restart:\n{}",
                self.node,
                self.tandemd_log()
            );
        }
        Ok(())
    }

    /// tandemd's pid (the process whose namespaces [`LibvirtHost::exec`] enters).
    fn pid(&self) -> u32 {
        self.tandemd.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `virsh -c <this host> ARGS...`.
    pub fn virsh(&self, args: &[&str]) -> CmdOutput {
        run(Command::new("virsh").arg("-c").arg(self.uri()).args(args))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Run a program inside the host (its network and mount namespaces), e.g.
    /// `exec("tandem", &["volume", "list"])` with the host's `/etc/tandem/tandem.toml`.
    /// Workspace binaries are given by name and found with [`bin`].
    pub fn exec(&self, program: &str, args: &[&str]) -> CmdOutput {
        run(&mut self.command(program, args)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The command [`LibvirtHost::exec`] runs, to spawn by hand (e.g. in the background).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = if program.starts_with("tandem") {
            bin(program).display().to_string()
        } else {
            program.to_string()
        };
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.pid().to_string())
            .args(["-m", "-n", "--"])
            .arg(&program)
            .args(args);
        command
    }

    /// `tandem volume status VOLUME --json` on this host.
    pub fn volume_status(&self, volume: &str) -> serde_json::Value {
        self.tandem(&["volume", "status", volume, "--json"])
            .ok()
            .json()
    }

    /// Poll `check` on the volume's status until `timeout`; panics with the last status.
    pub fn wait_volume_status(
        &self,
        volume: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let mut last = serde_json::Value::Null;
        let ok = wait_until(timeout, || {
            last = self.volume_status(volume);
            check(&last)
        });
        assert!(ok, "{}: {what} not reached; status: {last:#}", self.node);
    }

    /// `tandem ARGS...` on this host.
    pub fn tandem(&self, args: &[&str]) -> CmdOutput {
        self.exec("tandem", args)
    }

    /// A domain's state as `virsh domstate` prints it (`running`, `shut off`, ...).
    pub fn domstate(&self, domain: &str) -> String {
        self.virsh(&["domstate", domain]).stdout.trim().to_string()
    }

    /// Wait until `domain` is in `state`; false on timeout.
    pub fn wait_domstate(&self, domain: &str, state: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let now = self.domstate(domain);
            std::thread::sleep(Duration::from_millis(200));
            now == state
        })
    }

    fn kill_everything(&mut self) {
        // Every process of the host lives in its network namespace (QEMU included).
        for _ in 0..20 {
            let pids = run(Command::new("ip").args(["netns", "pids", &self.netns]))
                .map(|o| o.stdout)
                .unwrap_or_default();
            let pids: Vec<i32> = pids
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on pids listed in our own test namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut child) = self.tandemd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        self.kill_everything();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Several [`LibvirtHost`]s on one simulated network: a bridge in its own namespace, one
/// veth per host (`eth0`, 10.77.0.11, .12, ...), every node listed in every host's Tandem
/// config (control `IP:7700`, replication `IP:7788`, one shared secret), libvirtd listening
/// on TCP 16509 without auth (for `virsh migrate ... qemu+tcp://IP/system`). Dropping it
/// stops the hosts, then removes the bridge namespace.
pub struct Cluster {
    pub hosts: Vec<LibvirtHost>,
    switch: String,
}

impl Cluster {
    /// Start one host per name, with the hook installed. Hosts named `witness...` are
    /// diskless tiebreakers in the Tandem config.
    pub fn start(nodes: &[&str]) -> Result<Cluster> {
        let switch = unique_name("tlvsw");
        let mut cluster = Cluster {
            hosts: Vec::new(),
            switch: switch.clone(),
        };
        let ip_run = |args: &[&str]| -> Result<()> {
            let out = run(Command::new("ip").args(args))?;
            if !out.status.success() {
                bail!("ip {} failed: {}", args.join(" "), out.stderr);
            }
            Ok(())
        };
        ip_run(&["netns", "add", &switch])?;
        ip_run(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip_run(&["-n", &switch, "link", "set", "br0", "up"])?;
        let all: Vec<(String, Ipv4Addr)> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), Ipv4Addr::new(10, 77, 0, 11 + i as u8)))
            .collect();
        let secret = format!("cluster-secret-{}", unique_name("s"));
        for (name, ip) in &all {
            let view = ClusterView {
                ip: *ip,
                nodes: all.clone(),
                secret: secret.clone(),
            };
            let host = LibvirtHost::create(name, true, Some(view))?;
            let port = format!("p{}", cluster.hosts.len());
            ip_run(&[
                "-n",
                &switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ])?;
            ip_run(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            ip_run(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip_run(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
            cluster.hosts.push(host);
        }
        for host in &mut cluster.hosts {
            host.spawn_daemons()?;
        }
        Ok(cluster)
    }

    /// The host named `node`.
    pub fn host(&self, node: &str) -> &LibvirtHost {
        self.hosts
            .iter()
            .find(|h| h.node == node)
            .unwrap_or_else(|| panic!("no host {node} in the cluster"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.hosts.clear();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .stderr(Stdio::null())
            .status();
    }
}

/// The shared guest memory a vhost-user disk needs (what `disk-xml --frontend vhost-user`
/// asks for on stderr); [`with_vhost_memory`] adds it to a domain.
pub const VHOST_MEMORY: &str =
    "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>";

/// The `<disk type='vhostuser'>` (target vda) `tandem-libvirt-hook disk-xml VOLUME
/// --frontend vhost-user` prints on `host`, checked: `/run/tandem/vhost/<volume>.sock`, its
/// `<reconnect>`, and [`VHOST_MEMORY`] asked for.
pub fn vhost_disk_xml(host: &LibvirtHost, volume: &str) -> String {
    let out = host
        .exec(
            "tandem-libvirt-hook",
            &[
                "disk-xml",
                volume,
                "--target",
                "vda",
                "--frontend",
                "vhost-user",
            ],
        )
        .ok();
    let disk = out.stdout;
    assert!(
        disk.contains("<disk type='vhostuser'")
            && disk.contains(&format!("path='/run/tandem/vhost/{volume}.sock'"))
            && disk.contains("<reconnect enabled='yes' timeout='5'/>"),
        "{disk}"
    );
    assert!(out.stderr.contains(VHOST_MEMORY), "{}", out.stderr);
    disk
}

/// `domain_xml` (one with `<vcpu>1</vcpu>`, as [`tcg_domain_xml`] prints) with
/// [`VHOST_MEMORY`].
pub fn with_vhost_memory(domain_xml: &str) -> String {
    assert!(domain_xml.contains("<vcpu>1</vcpu>"), "{domain_xml}");
    domain_xml.replace(
        "<vcpu>1</vcpu>",
        &format!("<vcpu>1</vcpu>\n  {VHOST_MEMORY}"),
    )
}

/// A TCG domain (`<domain type='qemu'>`) booting `image` directly (kernel + initrd, no
/// firmware disk), serial console to `console` (a file the test reads), `disks_xml` as its
/// `<disk>` elements, destroyed on poweroff/reboot/crash so the guest's exit ends it.
pub fn tcg_domain_xml(
    name: &str,
    image: &GuestImage,
    cmdline: &str,
    disks_xml: &str,
    console: &Path,
) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks_xml}
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        kernel = image.kernel.display(),
        initrd = image.initrd.display(),
        console = console.display(),
    )
}

/// Guest script: writes `pattern` (repeated to `bytes`) to `/dev/vda` with fsync and prints
/// its sha256 (section `written`) and the sha256 of what `/dev/vda` then holds (`readback`).
pub fn write_pattern_script(pattern: &str, bytes: usize) -> String {
    assert!(
        pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " -_.".contains(c)),
        "plain pattern expected"
    );
    format!(
        r#"set -e
yes '{pattern}' | head -c {bytes} > /tmp/pattern
section written sha256sum /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=65536 conv=fsync 2>/dev/null
sync
section readback sh -c 'head -c {bytes} /dev/vda | sha256sum'
"#
    )
}

/// The bytes [`write_pattern_script`] writes.
pub fn pattern_bytes(pattern: &str, bytes: usize) -> Vec<u8> {
    let line = format!("{pattern}\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(bytes)
        .collect()
}
