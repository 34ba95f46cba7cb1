//! The VM lab behind `scripts/lab` (issue 21): hosts as QEMU virtual machines with real
//! power cuts, for failover drills.
//!
//! ```text
//!  outer host (root)                       lab network namespace "tlab-<tag>"
//!  tandem-lab up|down|ssh|drill             br-mgmt (192.168.77.0/24)  br-repl (10.77.77.0/24)
//!   ├─ Lab (this module): lab.json            │ lm-hv1 lm-hv2 lm-witness  │ lr-hv1 lr-hv2 lr-witness
//!   ├─ Host (host.rs): QEMU per host ─────────┴── eth: management ────────┴── eth: replication
//!   │    NVMe disk (vg_nvme: state LV + thin pool), virtio console = agent (agent.rs)
//!   └─ drill (drill.rs): workload, faults, checks
//! ```
//!
//! Every host boots Debian's kernel with an initramfs from `tests/vm/build-initramfs`
//! holding `tandemd`, `tandem`, `tandem-ha`, `tandem-check`, `tandem-libvirt-hook`, lvm2 and
//! the guest script `tests/vm/lab-host.sh` (network, first-boot LVM setup, tandemd, agent).
//! The lab directory keeps everything: `lab.json`, `image/`, and per host its disk,
//! console log, agent socket and QEMU pidfile, so separate `scripts/lab` invocations share
//! one running lab. The namespace's bridges connect the hosts only to each other, never to
//! the outside world.

pub mod agent;
pub mod drill;
pub mod host;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::vm::ImageBuilder;
use host::{BootSpec, Host};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// Size of each host's (sparse) NVMe disk.
pub const DISK_BYTES: u64 = 1 << 30;
/// How long a host may take from QEMU start to `@@LAB-READY` (TCG on a busy machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Kernel command-line word that sets the test-only switch in every host's tandemd.
pub const UNSAFE_DROP_FLUSH_ARG: &str = "lab.unsafe_drop_flush=1";

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Host names; a name starting with `witness` is a diskless tiebreaker.
    pub hosts: Vec<String>,
    pub memory_mib: u32,
    /// Directory of the built binaries (tandemd, tandem, ...).
    pub bin_dir: PathBuf,
    /// Test only: every tandemd drops flushes to its volumes' backing devices, and the
    /// pool keeps their data in the page cache (`cache = "writeback"`, see lab-host.sh).
    pub unsafe_drop_flush: bool,
}

impl LabOptions {
    pub fn new(bin_dir: PathBuf) -> LabOptions {
        LabOptions {
            hosts: vec!["hv1".into(), "hv2".into(), "witness".into()],
            memory_mib: 512,
            bin_dir,
            unsafe_drop_flush: false,
        }
    }
}

/// A lab: its directory, how its hosts boot, its hosts.
pub struct Lab {
    pub dir: PathBuf,
    pub boot: BootSpec,
    pub hosts: Vec<Host>,
}

/// `true` for the diskless tiebreaker.
pub fn is_witness(name: &str) -> bool {
    name.starts_with("witness")
}

impl Lab {
    /// Builds the image, the network and the disks, and boots every host (in parallel).
    /// Prints each host's boot time.
    pub fn up(dir: &Path, options: &LabOptions) -> Result<Lab> {
        if dir.join("lab.json").exists() {
            bail!(
                "{} already holds a lab; `scripts/lab down` first",
                dir.display()
            );
        }
        if options.hosts.is_empty() || options.hosts.len() > 9 {
            bail!("a lab has 1 to 9 hosts");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let image = build_image(&dir, options)?;
        let accel = accel(&image.kernel);
        if accel == "kvm" {
            println!("lab: KVM works here, but nested guests with libvirt and tandem-ha are not built yet; the drill promotes survivors itself");
        }
        let netns = format!(
            "tlab-{:08x}",
            crc32c::crc32c(dir.display().to_string().as_bytes())
        );
        let boot = BootSpec {
            netns,
            kernel: image.kernel,
            initrd: image.initrd,
            accel,
            memory_mib: options.memory_mib,
            append: if options.unsafe_drop_flush {
                UNSAFE_DROP_FLUSH_ARG.to_string()
            } else {
                String::new()
            },
        };
        let spec = json!({
            "hosts": options.hosts,
            "netns": boot.netns,
            "accel": boot.accel,
            "memory_mib": boot.memory_mib,
            "append": boot.append,
        });
        std::fs::write(dir.join("lab.json"), format!("{spec:#}\n")).context("writing lab.json")?;
        let mut lab = Lab::load(&dir)?;
        let started = lab.create_network().and_then(|()| {
            for host in &lab.hosts {
                host.create(DISK_BYTES)?;
            }
            lab.boot_all()
        });
        if let Err(e) = started {
            // Nothing half-built stays behind: VMs, namespace and directory go.
            if let Err(down) = lab.down() {
                eprintln!("lab: cleaning up after a failed start: {down:#}");
            }
            return Err(e);
        }
        Ok(lab)
    }

    /// The lab in `dir` (made by [`Lab::up`]), running or not.
    pub fn load(dir: &Path) -> Result<Lab> {
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no lab in {} (run `scripts/lab up`)", dir.display()))?;
        let spec: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let text_of = |key: &str| -> Result<String> {
            spec[key]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("{}: no {key}", path.display()))
        };
        let names: Vec<String> = spec["hosts"]
            .as_array()
            .with_context(|| format!("{}: no hosts", path.display()))?
            .iter()
            .filter_map(|h| h.as_str().map(str::to_string))
            .collect();
        let boot = BootSpec {
            netns: text_of("netns")?,
            kernel: dir.join("image/vmlinuz"),
            initrd: dir.join("image/initrd.gz"),
            accel: text_of("accel")?,
            memory_mib: spec["memory_mib"].as_u64().unwrap_or(512) as u32,
            append: text_of("append")?,
        };
        let hosts = names
            .iter()
            .enumerate()
            .map(|(i, name)| Host::new(dir, name, i + 1))
            .collect();
        Ok(Lab {
            dir: dir.to_path_buf(),
            boot,
            hosts,
        })
    }

    /// Boots every host that is not running, in parallel; prints the boot times.
    pub fn boot_all(&mut self) -> Result<()> {
        let boot = self.boot.clone();
        let results: Vec<(String, Result<Duration>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .hosts
                .iter_mut()
                .filter(|h| h.pid().is_none())
                .map(|host| {
                    let boot = &boot;
                    scope.spawn(move || (host.name.clone(), host.boot(boot, false, BOOT_TIMEOUT)))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for (name, result) in results {
            let took = result?;
            println!(
                "lab: {name} booted in {:.1} s ({})",
                took.as_secs_f64(),
                self.boot.accel
            );
        }
        Ok(())
    }

    pub fn host(&mut self, name: &str) -> Result<&mut Host> {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name} in this lab"))
    }

    /// The namespace, its two bridges and a persistent tap per host and network.
    fn create_network(&self) -> Result<()> {
        let ns = &self.boot.netns;
        ip(&["netns", "add", ns])?;
        for bridge in ["br-mgmt", "br-repl"] {
            ip(&["-n", ns, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", ns, "link", "set", bridge, "up"])?;
        }
        for host in &self.hosts {
            for (net, bridge) in [(1u8, "br-mgmt"), (2, "br-repl")] {
                let tap = host::tap(&host.name, net);
                ip(&["-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
                ip(&["-n", ns, "link", "set", &tap, "master", bridge, "up"])?;
            }
        }
        Ok(())
    }

    /// Cuts (`up == false`) or restores one NIC of a host: its tap goes down in the lab
    /// namespace, so frames in both directions are dropped. `net` 1 = management,
    /// 2 = replication.
    pub fn set_link(&self, host: &str, net: u8, up: bool) -> Result<()> {
        let tap = host::tap(host, net);
        ip(&[
            "-n",
            &self.boot.netns,
            "link",
            "set",
            &tap,
            if up { "up" } else { "down" },
        ])
    }

    /// Power off every host (SIGKILL), delete the namespace and the lab directory.
    pub fn down(mut self) -> Result<()> {
        for host in &mut self.hosts {
            if host.pid().is_some() {
                host.freeze(false).ok();
                host.power_cut()?;
            }
        }
        let _ = ip(&["netns", "del", &self.boot.netns]);
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }
}

/// `kvm` when `/dev/kvm` runs a guest, else `tcg`; `TANDEM_LAB_ACCEL` overrides.
///
/// Some hosts expose a `/dev/kvm` that refuses guests or never runs their vCPU, so the
/// probe boots `kernel` without a root file system and waits (up to 20 s) for its banner.
pub fn accel(kernel: &Path) -> String {
    if let Ok(accel) = std::env::var("TANDEM_LAB_ACCEL") {
        return accel;
    }
    if !Path::new("/dev/kvm").exists() {
        return "tcg".into();
    }
    let console = std::env::temp_dir().join(format!("tandem-lab-kvm-probe-{}", std::process::id()));
    let probe = Command::new(QEMU)
        .args([
            "-accel",
            "kvm",
            "-m",
            "256",
            "-display",
            "none",
            "-nodefaults",
        ])
        .args(["-no-user-config", "-no-reboot", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut booted = false;
    if let Ok(mut child) = probe {
        booted = crate::wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.contains("Linux version"))
        });
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_file(&console);
    if booted { "kvm" } else { "tcg" }.into()
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The tandem.toml of `name` in a lab of `hosts`.
pub fn host_config(name: &str, hosts: &[String]) -> String {
    let mut text = format!(
        "# Lab host {name} (generated by tests/src/lab).\nnode = \"{name}\"\nstate_dir = \"/var/lib/tandem-lab/tandem\"\nrun_dir = \"/run/tandem\"\nsecret_file = \"/etc/tandem/secret\"\n"
    );
    for (i, host) in hosts.iter().enumerate() {
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"{host}\"\ncontrol = \"192.168.77.1{n}:7700\"\nreplication = \"10.77.77.1{n}:7788\"\n",
            n = i + 1
        ));
        if is_witness(host) {
            text.push_str("diskless = true\n");
        }
    }
    if !is_witness(name) {
        text.push_str(
            "\n[[pools]]\nname = \"nvme\"\nbackend = \"lvm-thin\"\nvg = \"vg_nvme\"\nthinpool = \"thin\"\n",
        );
    }
    text
}

fn build_image(dir: &Path, options: &LabOptions) -> Result<crate::vm::GuestImage> {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).context("creating etc/")?;
    let script = std::fs::read_to_string(lab_script())
        .with_context(|| format!("reading {}", lab_script().display()))?;
    let mut builder = ImageBuilder::new(script)
        .module("nvme")
        .module("virtio_net")
        .module("virtio_console");
    for name in &options.hosts {
        let path = etc.join(format!("{name}.toml"));
        std::fs::write(&path, host_config(name, &options.hosts))
            .with_context(|| format!("writing {}", path.display()))?;
        builder = builder.file(&path, format!("/etc/tandem/{name}.toml"));
    }
    let secret = etc.join("secret");
    std::fs::write(&secret, format!("tandem-lab-{:016x}\n", seed_from_clock()))
        .context("writing the secret")?;
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .context("chmod 600 the secret")?;
    builder = builder.file(&secret, "/etc/tandem/secret");
    // tandem-ha and tandem-libvirt-hook link libvirt: about 50 MB more initramfs, minutes
    // of unpacking under TCG, and they serve nested guests, which the lab does not run yet.
    println!("lab: the image holds no tandem-ha / tandem-libvirt-hook (no nested guests yet)");
    for bin in ["tandemd", "tandem", "tandem-check"] {
        let path = options.bin_dir.join(bin);
        if !path.exists() {
            bail!(
                "{} not found; build first (cargo build --workspace --bins)",
                path.display()
            );
        }
        builder = builder.file(path, format!("/usr/local/bin/{bin}"));
    }
    let started = std::time::Instant::now();
    let image = builder
        .build(&dir.join("image"))
        .context("building the host image (tests/vm/build-initramfs)")?;
    println!(
        "lab: host image built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// `tests/vm/lab-host.sh` in this checkout.
pub fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/lab-host.sh")
}

/// A seed from the clock, for runs not given one.
pub fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
